"""What the relay, the oracle and the device CLI share as processes, and nothing else.

`proto` is pure and reads no clock, and neither service may import the other,
so the few process-level helpers all of them need live here:

- `clock`: the wall clock in the protocol's unit (`now_ms`);
- `logs`: the one structlog set-up, JSON lines on a chosen stream (`configure_logging`);
- `settings`: a frozen settings dataclass from flags over environment variables
  over defaults (`load_settings`), rendered for the start-up log with secrets
  masked (`describe`, `mask_url`);
- `client_address`: the real client behind trusted proxies, for per-address budgets;
- `listener`: a listening socket that counts every accepted socket against a cap;
- `files`: crash-safe file replacement (`write_atomically`), for key files and chains.

Nothing in this package imports `continuum`, `oracle` or `client`.
"""
