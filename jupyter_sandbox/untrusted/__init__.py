"""The host side's checks of everything that comes out of a sandbox.

A sandbox's agent serves the sandbox, not the host: the service, the gateway and
the client treat every frame, result, name, mode, link and size it sends as
hostile. ``messages`` checks the size and shape of agent frames and results,
``names`` the file names a sandbox reports, ``extract`` writes sandbox-made files
and trees onto the host, and ``streams`` bounds what is read, in bytes and time.
"""
