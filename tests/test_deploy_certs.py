"""The deployment's certificates and device keys: a device key never touches the CA, a CA that
exists is never replaced without --renew, and --host names the server the devices reach."""
from cryptography import x509

from simulations.deploy.certs import main


def _sans(path):
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.DNSName)} | \
        {str(v) for v in ext.get_values_for_type(x509.IPAddress)}


def test_node_keys_never_touch_the_ca_and_the_ca_is_never_replaced_silently(tmp_path, capsys):
    assert main([str(tmp_path), "--host", "server.example.org", "--host", "10.1.2.3"]) == 0
    ca, cert, key = (tmp_path / n for n in ("ca.crt", "server.pem", "server.key"))
    before = [p.read_bytes() for p in (ca, cert, key)]
    assert {"server.example.org", "10.1.2.3", "127.0.0.1", "localhost"} <= _sans(cert)
    assert main([str(tmp_path), "--node-key", "phone-1", "--node-key", "phone-2"]) == 0
    assert (tmp_path / "phone-1").stat().st_mode & 0o777 == 0o600 and (tmp_path / "phone-2.pub").is_file()
    assert [p.read_bytes() for p in (ca, cert, key)] == before  # the running SuperLink's CA stays valid
    first_key = (tmp_path / "phone-1").read_bytes()
    capsys.readouterr()
    assert main([str(tmp_path), "--node-key", "phone-1"]) == 2  # an existing device key is not overwritten
    assert "never overwritten" in capsys.readouterr().err and (tmp_path / "phone-1").read_bytes() == first_key
    assert main([str(tmp_path)]) == 2  # a second CA would orphan every device
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--renew" in err and ca.read_bytes() == before[0]
    assert main([str(tmp_path), "--node-key", "../escape"]) == 2
    assert main([str(tmp_path), "--renew", "--host", "10.9.9.9"]) == 0
    assert ca.read_bytes() != before[0] and "10.9.9.9" in _sans(cert)
