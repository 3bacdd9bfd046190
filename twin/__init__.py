"""The local cluster twin: real Lambda + real node agent + real etcd against moto (see twin/cluster.py)."""
