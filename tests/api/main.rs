//! Integration tests: real HTTP against the app, on the embedded store and on
//! a private redis-server started by each test.

mod bad_input;
mod faults;
mod helpers;
mod readme;
mod seats;
mod usage;
