"""The router on one machine, with stand-ins for Synapse: for people and for tests."""
