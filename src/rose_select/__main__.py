import sys

from rose_select.cli import main
from rose_select.distributed import end_rank

if __name__ == "__main__":
    sys.exit(end_rank(main()))  # torchrun starts its workers here (distributed.torchrun_command)
