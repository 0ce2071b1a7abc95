/*
 * qkdproxy bench load generator: runs as its own process, outside the measured tunnels, so
 * the baseline is not limited by a Python event loop. Loopback (127.0.0.1) only.
 *
 *   loadgen conn PORT COUNT CONCURRENCY
 *       CONCURRENCY threads, each opening COUNT/CONCURRENCY connections one after the other:
 *       connect, write one byte, read the one-byte echo, close.
 *   loadgen hold PORT COUNT
 *       Opens COUNT connections (one-byte echo each, to prove they are up end to end),
 *       prints {"ready": COUNT}, keeps them open until stdin closes, then closes them.
 *   loadgen bulk PORT BYTES STREAMS
 *       STREAMS threads each send BYTES/STREAMS bytes, half-close, and read the 8-byte
 *       big-endian count the sink answers with, which must match.
 *
 * Every mode prints one JSON line on stdout; exit status 1 on any failure.
 * Latency percentiles use the index rule of the Python fallback: sorted[min(n-1, q*n)].
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
#include <time.h>
#include <unistd.h>

#include "common.h"

#define BULK_CHUNK (256 * 1024)

static int port;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return (double)usage.ru_utime.tv_sec + (double)usage.ru_utime.tv_usec / 1e6 +
           (double)usage.ru_stime.tv_sec + (double)usage.ru_stime.tv_usec / 1e6;
}

static int dial(void) {
    struct sockaddr_in addr;
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    /* Like asyncio (the Python fallback) and the stunnel configuration: no Nagle delay. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int recv_exactly(int fd, char *data, size_t size) {
    while (size > 0) {
        ssize_t got = recv(fd, data, size, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return -1;
        data += got;
        size -= (size_t)got;
    }
    return 0;
}

/* One byte out, the same byte back: the connection works end to end. */
static int ping(int fd) {
    char byte = 'x';
    char echo = 0;
    if (send_all(fd, &byte, 1) < 0 || recv_exactly(fd, &echo, 1) < 0) return -1;
    return echo == byte ? 0 : -1;
}

/* ---------------------------------------------------------------- conn */

struct conn_worker {
    pthread_t thread;
    long count;
    long errors;
    double *latencies;
    long done;
};

static void *conn_run(void *arg) {
    struct conn_worker *w = arg;
    for (long i = 0; i < w->count; i++) {
        double started = now_s();
        int fd = dial();
        if (fd < 0 || ping(fd) < 0) {
            if (fd >= 0) close(fd);
            w->errors++;
            continue;
        }
        close(fd);
        w->latencies[w->done++] = now_s() - started;
    }
    return NULL;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double quantile_ms(const double *sorted, long n, double q) {
    long index = (long)(q * (double)n);
    if (n == 0) return 0.0;
    if (index > n - 1) index = n - 1;
    return sorted[index] * 1000.0;
}

static int conn_mode(long count, long concurrency) {
    long share = count / concurrency;
    struct conn_worker *workers = calloc((size_t)concurrency, sizeof *workers);
    double *all = malloc(sizeof(double) * (size_t)(share * concurrency + 1));
    long n = 0, errors = 0;
    double sum = 0.0;
    if (workers == NULL || all == NULL) return 1;
    double cpu0 = cpu_s(), started = now_s();
    for (long i = 0; i < concurrency; i++) {
        workers[i].count = share;
        workers[i].latencies = all + i * share;
        if (pthread_create(&workers[i].thread, NULL, conn_run, &workers[i]) != 0) return 1;
    }
    for (long i = 0; i < concurrency; i++) pthread_join(workers[i].thread, NULL);
    double elapsed = now_s() - started;
    /* Compact the per-thread slices (a failed connection leaves its slot unused). */
    for (long i = 0; i < concurrency; i++) {
        memmove(all + n, workers[i].latencies, sizeof(double) * (size_t)workers[i].done);
        n += workers[i].done;
        errors += workers[i].errors;
    }
    qsort(all, (size_t)n, sizeof(double), by_value);
    for (long i = 0; i < n; i++) sum += all[i];
    printf("{\"connections\": %ld, \"errors\": %ld, \"elapsed_s\": %.6f, \"p50_ms\": %.4f, "
           "\"p90_ms\": %.4f, \"p99_ms\": %.4f, \"max_ms\": %.4f, \"mean_ms\": %.4f, "
           "\"cpu_s\": %.6f}\n",
           n, errors, elapsed, quantile_ms(all, n, 0.5), quantile_ms(all, n, 0.9),
           quantile_ms(all, n, 0.99), n ? all[n - 1] * 1000.0 : 0.0,
           n ? sum / (double)n * 1000.0 : 0.0, cpu_s() - cpu0);
    return errors ? 1 : 0;
}

/* ---------------------------------------------------------------- hold */

static int hold_mode(long count) {
    int *fds = malloc(sizeof(int) * (size_t)(count + 1));
    char line[64];
    if (fds == NULL) return 1;
    raise_fd_limit();
    for (long i = 0; i < count; i++) {
        fds[i] = dial();
        if (fds[i] < 0 || ping(fds[i]) < 0) {
            fprintf(stderr, "loadgen: idle connection %ld failed\n", i);
            return 1;
        }
    }
    printf("{\"ready\": %ld}\n", count);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin) != NULL) {
    }
    for (long i = 0; i < count; i++) close(fds[i]);
    free(fds);
    return 0;
}

/* ---------------------------------------------------------------- bulk */

struct bulk_worker {
    pthread_t thread;
    uint64_t size;
    int failed;
};

static char block[BULK_CHUNK];

static void *bulk_run(void *arg) {
    struct bulk_worker *w = arg;
    unsigned char answer[8];
    uint64_t counted = 0;
    int fd = dial();
    if (fd < 0) {
        w->failed = 1;
        return NULL;
    }
    for (uint64_t sent = 0; sent < w->size;) {
        size_t piece = w->size - sent < BULK_CHUNK ? (size_t)(w->size - sent) : BULK_CHUNK;
        if (send_all(fd, block, piece) < 0) {
            w->failed = 1;
            close(fd);
            return NULL;
        }
        sent += piece;
    }
    shutdown(fd, SHUT_WR);
    if (recv_exactly(fd, (char *)answer, sizeof answer) < 0) {
        w->failed = 1;
    } else {
        for (int i = 0; i < 8; i++) counted = (counted << 8) | answer[i];
        w->failed = counted != w->size;
    }
    close(fd);
    return NULL;
}

static int bulk_mode(uint64_t total, long streams) {
    struct bulk_worker *workers = calloc((size_t)streams, sizeof *workers);
    uint64_t share = total / (uint64_t)streams, moved = 0;
    int failed = 0;
    unsigned int seed = 1;
    if (workers == NULL) return 1;
    /* Not compressible, not all zero: nothing on the path can take a shortcut. */
    for (size_t i = 0; i < sizeof block; i++) block[i] = (char)(rand_r(&seed) & 0xff);
    double cpu0 = cpu_s(), started = now_s();
    for (long i = 0; i < streams; i++) {
        workers[i].size = share;
        if (pthread_create(&workers[i].thread, NULL, bulk_run, &workers[i]) != 0) return 1;
    }
    for (long i = 0; i < streams; i++) {
        pthread_join(workers[i].thread, NULL);
        failed |= workers[i].failed;
        moved += workers[i].size;
    }
    double elapsed = now_s() - started;
    printf("{\"bytes\": %llu, \"streams\": %ld, \"failed\": %d, \"elapsed_s\": %.6f, "
           "\"cpu_s\": %.6f}\n",
           (unsigned long long)moved, streams, failed, elapsed, cpu_s() - cpu0);
    return failed;
}

int main(int argc, char **argv) {
    if (argc >= 4) port = atoi(argv[2]);
    if (argc == 5 && strcmp(argv[1], "conn") == 0 && atol(argv[4]) > 0) {
        return conn_mode(atol(argv[3]), atol(argv[4]));
    }
    if (argc == 4 && strcmp(argv[1], "hold") == 0) return hold_mode(atol(argv[3]));
    if (argc == 5 && strcmp(argv[1], "bulk") == 0 && atol(argv[4]) > 0) {
        return bulk_mode(strtoull(argv[3], NULL, 10), atol(argv[4]));
    }
    fprintf(stderr, "usage: loadgen conn PORT COUNT CONCURRENCY | hold PORT COUNT | "
                    "bulk PORT BYTES STREAMS\n");
    return 2;
}
