//! QUEL front end (being written).
