"""What the relay, the oracle and the device CLI share as processes, and nothing else.

`proto` is pure and reads no clock, and neither service may import the other,
so the few process-level helpers all of them need live here: the wall clock
in the protocol's unit (`clock`).  Nothing in this package imports
`continuum`, `oracle` or `client`.
"""
