#!/usr/bin/env bash
# History and restore benchmark (issue 20): `history`, `trash` and a
# point-in-time restore of a whole 100,000-file folder after a mass delete,
# on two real in-process nodes (seconds, peak RSS growth). In a network
# namespace of its own when root. Prints one table, run by run and medians.
# No other tool restores a folder to a point in time, so there is no side
# to compare against; to compare two builds, run it in each checkout.
#
# usage: scripts/bench/history.sh [--files N] [--runs N]
exec "$(dirname "$0")/in-netns.sh" shoal-bench-history "$@"
