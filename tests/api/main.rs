//! Integration tests: real HTTP against the app, on the embedded store and on
//! a private redis-server started by each test.

mod faults;
mod helpers;
mod bad_input;
mod seats;
mod usage;
