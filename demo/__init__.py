"""The one-command demo of relay, oracle and devices (`continuum-demo`)."""
