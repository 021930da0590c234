"""``make bench`` (:mod:`bench.run`) and ``make chaos`` (:mod:`bench.chaos`): the relay measured
against this machine's limits and a peer, and broken on purpose (issue 7)."""
