"""Summarise a py-spy ``--format raw`` (collapsed stacks) file: self and total samples per function."""

import collections
import sys

self_samples: collections.Counter[str] = collections.Counter()
total_samples: collections.Counter[str] = collections.Counter()
grand = 0
for line in open(sys.argv[1]):
    stack, _, count = line.rstrip().rpartition(" ")
    n = int(count)
    frames = stack.split(";")
    grand += n
    self_samples[frames[-1]] += n
    for frame in set(frames):
        total_samples[frame] += n
print(f"{grand} samples")
for frame, n in self_samples.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 40):
    print(f"self {100 * n / grand:5.1f}%  total {100 * total_samples[frame] / grand:5.1f}%  {frame}")
