"""Sans-IO protocol cores: no sockets, no Trio, no database in here."""
