#!/usr/bin/env bash
# Document propagation benchmark (2 and 8 in-process nodes), in a network
# namespace of its own when root. Prints a table.
#
# usage: scripts/bench/docs.sh [--changes N] [--burst N] [--runs N] [--nodes N...]
exec "$(dirname "$0")/in-netns.sh" shoal-bench-docs "$@"
