"""``python -m permcompile ...`` is the ``permcompile`` command."""
from .cli import main

if __name__ == "__main__":
    main()
