"""The device<->server contract: run config, reply envelope, summaries, privacy, signed apps."""
