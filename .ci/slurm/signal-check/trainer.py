"""Stand-in for `ldm train` in .ci/slurm/signal-check.sh: records each start (with SLURM's job id), on
SIGTERM/SIGUSR1 records the signal, "snapshots" for 3 s, and exits 75 like `ldm train`; else runs ~25 s."""
import os
import signal
import sys
import time

out = sys.argv[1]
marker = out + ".events"


def note(text):
    with open(marker, "a") as f:
        f.write(text + "\n")


def stop(sig, frame):
    note(f"signal {signal.Signals(sig).name}")
    time.sleep(3)  # writing a snapshot
    note("snapshot written")
    sys.exit(75)


for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, stop)
note(f"start job={os.environ.get('SLURM_JOB_ID')}")
time.sleep(25)
with open(out, "w") as f:
    f.write("done\n")
