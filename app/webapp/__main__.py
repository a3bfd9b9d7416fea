"""`python -m ovseg.app.webapp`: the same as `ovseg-app` (the browser tests start the app this way)."""

from ovseg.app.webapp import main

raise SystemExit(main())
