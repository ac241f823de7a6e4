from stablenets.pipeline.cli import main

raise SystemExit(main())
