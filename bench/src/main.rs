fn main() { println!("ringway-load: not yet built"); }
