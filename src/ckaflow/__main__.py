from ckaflow.cli import main

raise SystemExit(main())
