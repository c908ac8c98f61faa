"""The Ray side: cluster connection and actors that hold a model and process shards."""
