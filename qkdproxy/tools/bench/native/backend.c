/*
 * qkdproxy bench backend: the server the tunnels connect to, as its own process, outside
 * the measured tunnels. Listens on 127.0.0.1 only; one thread per connection (small stacks),
 * so many idle connections cost it little and bulk streams use every core.
 *
 *   backend echo   echo every byte back until the peer half-closes, then close
 *   backend sink   count bytes to EOF, answer with the count (8 bytes, big-endian), close
 *
 * Prints {"port": N} once it listens (an ephemeral port), then serves until terminated.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"

#define BUFFER (64 * 1024)
#define STACK (256 * 1024)

static int sink;

static void *serve(void *arg) {
    int fd = (int)(intptr_t)arg;
    char buffer[BUFFER];
    uint64_t total = 0;
    for (;;) {
        ssize_t got = recv(fd, buffer, sizeof buffer, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break;
        total += (uint64_t)got;
        if (!sink && send_all(fd, buffer, (size_t)got) < 0) break;
    }
    if (sink) {
        unsigned char answer[8];
        for (int i = 7; i >= 0; i--, total >>= 8) answer[i] = (unsigned char)(total & 0xff);
        send_all(fd, (const char *)answer, sizeof answer);
    }
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    struct sockaddr_in addr;
    socklen_t length = sizeof addr;
    pthread_attr_t attr;
    int one = 1;
    if (argc != 2 || (strcmp(argv[1], "echo") != 0 && strcmp(argv[1], "sink") != 0)) {
        fprintf(stderr, "usage: backend echo|sink\n");
        return 2;
    }
    sink = strcmp(argv[1], "sink") == 0;
    raise_fd_limit();
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        listen(listener, 4096) < 0 ||
        getsockname(listener, (struct sockaddr *)&addr, &length) < 0) {
        perror("backend");
        return 1;
    }
    printf("{\"port\": %d}\n", ntohs(addr.sin_port));
    fflush(stdout);
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, STACK);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (;;) {
        pthread_t thread;
        int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE) {
                usleep(10000); /* out of descriptors: let connections finish */
                continue;
            }
            perror("backend: accept");
            return 1;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (pthread_create(&thread, &attr, serve, (void *)(intptr_t)fd) != 0) close(fd);
    }
}
