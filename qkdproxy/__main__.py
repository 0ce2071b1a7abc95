from qkdproxy.cli.main import main

raise SystemExit(main())
