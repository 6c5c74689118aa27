import Glibc

@inline(__always) func _pow(_ base: Double, _ exponent: Double) -> Double { Glibc.pow(base, exponent) }
