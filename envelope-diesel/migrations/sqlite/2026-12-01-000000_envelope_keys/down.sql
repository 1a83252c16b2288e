-- Dropping the key table shreds every value sealed under its keys: they can never be read again.
DROP TABLE IF EXISTS envelope_keys;
