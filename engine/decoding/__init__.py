"""Token decoding: the sampling plan (temperature, top-k/top-p, per-row generators, EOS and stop
strings), the one decode loop, and its step backends (eager decoder, persistent runner)."""
