import sys

from rose_select.cli import main

if __name__ == "__main__":
    sys.exit(main())
