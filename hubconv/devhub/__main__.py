from hubconv.devhub.cli import serve

raise SystemExit(serve())
