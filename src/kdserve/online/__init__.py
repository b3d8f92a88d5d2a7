"""The online transport: a teacher's Arrow Flight server, the student's client, and what
crosses between them (the protocol, messages, the replay window, same-host tokens).
"""
