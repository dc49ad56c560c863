from dimee_models.cli import main

raise SystemExit(main())
