from qkdproxy.cli import main

raise SystemExit(main())
