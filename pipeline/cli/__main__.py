"""`python -m kdcache.pipeline.cli`: what torchrun launches (`torchrun ... -m kdcache.pipeline.cli train`)."""

from kdcache.pipeline.cli import main

raise SystemExit(main())
