"""One site in a federation, framework-free: what is exchanged, how a site trains
(plain, FedProx, DP-SGD) and the wire keys of its messages. Flower glue lives in
``client/`` and ``server/``."""
