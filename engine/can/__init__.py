"""The CAN path: raw frames decoded with a DBC at ingest, log replay and raw-frame simulation."""
