"""The bundled bridge: serves the built-in commands of docs/PROTOCOL.md.

Python compiles a script on every start but caches an imported module's bytecode, so this
script stays tiny and the commands live in :mod:`snakepit_python.builtin_commands`.
"""

if __name__ == "__main__":
    import snakepit_python.builtin_commands  # noqa: F401 - registers the commands on import
    from snakepit_python import run

    run()
