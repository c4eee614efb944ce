"""matrix-spoa: a SPOE agent that routes Matrix Synapse requests for HAProxy."""

__version__ = "0.1.0"

#: The agent's HTTP endpoint (metrics, health, status page) by default: next
#: to the SPOP port 12345, and clear of Prometheus' 9090 and of the 9100-9999
#: range Prometheus allocates to exporters.
DEFAULT_HTTP = "127.0.0.1:12346"
