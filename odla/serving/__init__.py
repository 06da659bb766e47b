"""What the operator and the node agent share to serve HTTP: the streaming response, bounded
bodies, the lifespan and its loops, credentials, and a job's record."""
