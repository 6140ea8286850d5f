#!/usr/bin/env bash
# Event stream benchmark: events per second to 1 and 10 SSE consumers, and
# the cost of 10 consumers during a busy folder sync. In a network namespace
# of its own when root. Prints two tables.
#
# usage: scripts/bench/events.sh [--burst N] [--files N] [--runs N]
exec "$(dirname "$0")/in-netns.sh" shoal-bench-events "$@"
