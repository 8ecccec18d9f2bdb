"""`benchmarks/gpu_check.py`: its CPU form (every GPU phase skipped, exit 0, a JSON) and the README tables it
renders from a GPU report."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

import gpu_check  # noqa: E402


def test_cpu_form_skips_every_gpu_phase(tmp_path):
    out = tmp_path / 'check.json'
    done = subprocess.run([sys.executable, 'benchmarks/gpu_check.py', '--out', str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report['environment']['cuda'] is False
    assert set(report['phases']) == {'tests', 'step_cost', 'analyze_cost'}
    assert all(p == {'status': 'skipped', 'reason': 'no CUDA device: the GPU phases were skipped'}
               for p in report['phases'].values())
    assert 'No GPU figures yet' in done.stdout


GPU_REPORT = {
    'environment': {'cuda': True, 'device': 'NVIDIA H200', 'device_count': 1, 'torch': '2.x', 'timm': '1.0.31',
                    'cuda_version': '13.0'},
    'started': '2030-01-01 00:00:00',
    'phases': {
        'tests': {'status': 'passed', 'command': 'pytest tests/test_gpu.py',
                  'tests': [{'test': 'tests.test_gpu::test_st_pp_steps_never_synchronise', 'outcome': 'passed',
                             'seconds': 1.5}],
                  'figures': [{'figure': 'inductor_cuda_graphs_grid8', 'graphs': 9, 'sides_drawn': 3}]},
        'step_cost': {'status': 'passed', 'command': f'{sys.executable} benchmarks/step_cost.py --device cuda --json x',
                      'report': {'table': '| config | images/s |\n| --- | ---: |\n| ST++ | 1234.5 |'}},
        'analyze_cost': {'status': 'ran out of its 70 s', 'command': 'x', 'report': None},
    },
}


def test_render_and_readme_block(tmp_path):
    text = gpu_check.render(GPU_REPORT)
    assert 'on NVIDIA H200 (1 GPU)' in text
    assert '(`python benchmarks/step_cost.py --device cuda`):' in text and '| ST++ | 1234.5 |' in text
    assert '**analyze_cost**: ran out of its 70 s' in text
    assert '| test_st_pp_steps_never_synchronise | passed | 1.5 |' in text
    assert '| inductor_cuda_graphs_grid8 | graphs 9, sides_drawn 3 |' in text
    readme = tmp_path / 'README.md'
    readme.write_text(f'# x\n\n## Benchmarks\n\n{gpu_check.BEGIN}\nold\n{gpu_check.END}\n\n## Next\n')
    gpu_check.update_readme(readme, text)
    content = readme.read_text()
    assert 'old' not in content and content.startswith('# x\n\n## Benchmarks\n\n') and content.endswith('\n## Next\n')
    assert content.count('| ST++ | 1234.5 |') == 1
    source = json.dumps(GPU_REPORT)
    (tmp_path / 'r.json').write_text(source)
    assert gpu_check.main(['--render', str(tmp_path / 'r.json'), '--readme', str(readme)]) == 1  # a phase ran out
    assert readme.read_text() == content
