"""The online transport: a teacher's Arrow Flight server, the student's client, and what
crosses between them.

    protocol, wire       the typed, versioned messages, and their encoding and checks
    messages             user messages (JSON values and numpy arrays, no pickle)
    server, guard        the teacher's server; its token check and one-line errors
    serve_pass, serve_query, mailbox
                         the teacher's side of streams, queries and messages
    client, client_errors
                         the student's connection; teachers' errors as kdserve's
    read_pass, ask_query the student's side of streams and queries
    replay               the teacher's replay window (resume without loss or repeats)
    address, tokens      host:port parsing; same-host tokens in private files
"""
