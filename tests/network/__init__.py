"""The whole network as real processes: several programs at once, faults, hostile input."""
