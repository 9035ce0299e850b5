"""daemon: the caller-ID daemon, its sans-IO wire protocol, authentication and client.

Owns: the protocol (bytes <-> typed messages), munge/HMAC authentication, the socket lookup
(connection -> process -> job), the asyncio server and the `callerid` CLI.
Imports: cgroups (pid -> job); never pam_callerid.
"""
