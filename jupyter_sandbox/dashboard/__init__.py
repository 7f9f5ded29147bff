"""The instructor dashboard: every student's sandboxes, served as a JupyterHub service.

JupyterHub starts it (``c.JupyterHub.services``, see the README's "JupyterHub"
section) at ``/services/sandboxes/``; it logs users in through the hub's OAuth and
talks to the machine's system sandbox service.
"""
