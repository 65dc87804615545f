"""pytest plugin (lands with the pytest issue): inert unless used."""
