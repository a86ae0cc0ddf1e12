"""One module per CLI verb: a `HELP` line, a frozen `Config` dataclass and `run(cfg) -> int`.

The CLI discovers verbs from this package, so adding a verb means adding a module here.
Keep module-level imports light (no torch, no ray): every verb's module is imported to
build the parser. Module `import_teacher` becomes the verb `import-teacher`.
"""
