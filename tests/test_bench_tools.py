"""bench/sampler_ab/compare.py: reading ptxas reports and cuobjdump SASS, and what it calls a change."""
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "bench", "sampler_ab"))
import compare  # noqa: E402

HASH_A = "_GLOBAL__N__fada500e_7_wrap_cu_d8c2a10e"
HASH_B = "_GLOBAL__N__0badcafe_7_wrap_cu_12345678"

PTXAS = """ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_90a'
ptxas info    : Function properties for _Z6kernelv
    {stack} bytes stack frame, {stores} bytes spill stores, 0 bytes spill loads
ptxas info    : Used {regs} registers, used 1 barriers
ptxas info    : Function properties for _Z6helperv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""

SASS = """
	code for sm_90a
		Function : _ZN7fusedlm13sampling_cuda{hash}11demo_kernelEv
	.headerflags	@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                     /* 0x00000a00ff017b82 */
        /*0010*/                   FADD{mode} R2, R3, R4 ;                 /* 0x0000000403027221 */
        /*0020*/               @P0 BRA {target} ;                          /* 0x0000000000000947 */
        /*0030*/                   EXIT ;                                     /* 0x000000000000794d */
		..........
"""


def test_ptxas_report_reads_registers_stack_and_spills():
    r = compare.ptxas_report(PTXAS.format(stack=16, stores=8, regs=128))
    assert r["_Z6kernelv"] == {"regs": 128, "stack": 16, "spill_stores": 8, "spill_loads": 0}
    assert r["_Z6helperv"] == {"stack": 0, "spill_stores": 0, "spill_loads": 0}


def test_report_differences_name_only_changed_functions():
    base = compare.ptxas_report(PTXAS.format(stack=16, stores=0, regs=128))
    same = compare.ptxas_report(PTXAS.format(stack=16, stores=0, regs=128))
    spilled = compare.ptxas_report(PTXAS.format(stack=24, stores=8, regs=128))
    assert compare.compare_reports([base, same], ["main", "x"]) == []
    lines = compare.compare_reports([base, spilled], ["main", "x"])
    assert len(lines) == 1 and "main: 128 regs, 16/0/0" in lines[0] and "x: 128 regs, 24/8/0" in lines[0]


def test_sass_ignores_addresses_hashes_and_branch_targets_but_not_instructions():
    base = compare.sass_functions(SASS.format(hash=HASH_A, mode="", target="0x30"))
    moved = compare.sass_functions(SASS.format(hash=HASH_B, mode="", target="0x470"))
    rounded = compare.sass_functions(SASS.format(hash=HASH_A, mode=".RP", target="0x30"))
    (name, body), = base.items()
    assert len(body) == 4 and body[-1] == "EXIT ;"
    assert list(moved.values()) == [body] and list(moved) != [name]
    assert compare.compare_sass([base, moved], ["main", "x"]) == []  # another file hash, another target

    lines = compare.compare_sass([base, rounded], ["main", "x"])
    assert len(lines) == 1 and "x: 4 ins, 1 changed" in lines[0]
