"""`ray start` that keeps every address on 127.0.0.1, for the tests' throwaway multi-node cluster.

On Linux, Ray rewrites a 127.0.0.1 node address to the machine's routable IP so that other
machines can join; the tests must listen on loopback only. This wrapper turns that rewrite off
and then runs Ray's own CLI: ``python tests/ray_loopback.py start --head ...``. Drivers that join
such a cluster set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's switch for the same rewrite.
"""

import sys

import ray._private.services as services
from ray.scripts.scripts import main

services.resolve_ip_for_localhost = lambda host: host

if __name__ == "__main__":
    sys.argv = ["ray", *sys.argv[1:]]
    main()
