from aimcpipe.launch.cli import main

raise SystemExit(main())
