//! Backend selection: stable flow-key hashing and consistent-hash tables (pure code).
