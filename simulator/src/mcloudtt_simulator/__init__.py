"""MCloudTT fleet simulator: a simpy model of an IoT fleet.

`mcloudtt-sim plan` runs it in virtual time (`plan.py`, cohorts per device class) to predict the
load on the cluster and size it; `mcloudtt-sim run` paces the same device model in real time
(`realtime.py`) against real brokers and verifies delivery. Scenarios are TOML files
(`scenario.py`; shipped ones in `scenarios/`).
"""

__version__ = "0.1.0"
