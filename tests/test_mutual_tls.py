"""Mutual TLS through the public API: Teacher(tls_client_ca=) serves only students that
present a certificate from that CA (Student(tls_client_cert=))."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import trustme

import kdserve as kd

TOKEN = "mutual-tls-token"


def test_a_mutual_tls_teacher_serves_certified_students_only():
    ca, stranger_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    pem = lambda blob: blob.bytes()  # noqa: E731
    student_cert = ca.issue_cert("student")
    stranger = stranger_ca.issue_cert("stranger")  # a well-formed pair from another CA
    client_pair = (pem(student_cert.cert_chain_pems[0]), pem(student_cert.private_key_pem))
    teacher = kd.Teacher(
        out_port=0,
        token=TOKEN,
        tls_cert=pem(server.cert_chain_pems[0]),
        tls_key=pem(server.private_key_pem),
        tls_client_ca=pem(ca.cert_pem),
        progress=False,
    )
    teacher.start()
    x = np.arange(20, dtype=np.float32)[:, None]
    thread = threading.Thread(
        target=teacher.start_knowledge_service,
        args=(["x"], ["y"], lambda f: {"y": f["x"] + 1}, [(x[:10],), (x[10:],)]),
        daemon=True,
    )
    thread.start()
    try:
        outsider = kd.Student(
            token=TOKEN,
            tls_root_certs=pem(ca.cert_pem),
            tls_client_cert=(pem(stranger.cert_chain_pems[0]), pem(stranger.private_key_pem)),
            connect_timeout=2.0,
        )
        outsider.register_teacher(in_address=teacher.address)
        with pytest.raises(kd.KdserveError):
            outsider.start()
        student = kd.Student(
            token=TOKEN,
            tls_root_certs=pem(ca.cert_pem),
            tls_client_cert=client_pair,
            connect_timeout=20.0,
        )
        student.register_teacher(in_address=teacher.address)
        student.start()
        got = list(student.get_knowledge_generator(batch_size=20)())
        np.testing.assert_array_equal(got[0]["sample_id"], np.arange(20))
        np.testing.assert_array_equal(got[0]["y"], x + 1)
        student.close()
        thread.join(20)
        assert not thread.is_alive()
    finally:
        teacher.close()
