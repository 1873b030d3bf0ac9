"""A slice view of a segmentation, rendered by VTK offscreen, for the README.

Slicer draws segments in slice views as a coloured, half-transparent fill over the grey volume. The same
picture is built here from the scene's own data: the volume node's voxels under its display window/level,
and each segment's voxels (exported from the segmentation node) in the segment's colour, as two image
actors in an offscreen VTK render window.
"""
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

OPACITY = 0.5
SIZE = 512


def render_axial_slice(volume_node, segmentation_node, path: Path) -> Path:
    import slicer
    from SegmentMBTFESlicer.segmentation import segment_array
    voxels = slicer.util.arrayFromVolume(volume_node).astype(float)
    segmentation = segmentation_node.GetSegmentation()
    masks = [(segment_array(segmentation_node, segmentation.GetNthSegmentID(i)),
              segmentation.GetNthSegment(i).GetColor()) for i in range(segmentation.GetNumberOfSegments())]
    k = int(np.argmax(sum(mask.sum(axis=(1, 2)) for mask, _ in masks)))  # the slice showing most segment
    grey = _window(voxels[k])
    overlay = np.zeros(grey.shape + (4,), np.uint8)
    for mask, color in masks:
        overlay[mask[k] > 0] = [int(255 * c) for c in color] + [int(255 * OPACITY)]
    rgb = np.repeat(grey[..., None], 3, axis=2)
    return _render([_image(rgb), _image(overlay)], Path(path))


def _window(slice_: np.ndarray) -> np.ndarray:
    low, high = np.percentile(slice_, (1, 99))
    return (255 * np.clip((slice_ - low) / max(high - low, 1e-6), 0, 1)).astype(np.uint8)


def _image(pixels: np.ndarray) -> vtk.vtkImageData:
    """(rows=j, columns=i, components) -> vtkImageData; rows are flipped so anterior is up, as in Slicer."""
    pixels = np.ascontiguousarray(pixels[::-1])
    image = vtk.vtkImageData()
    image.SetDimensions(pixels.shape[1], pixels.shape[0], 1)
    array = numpy_support.numpy_to_vtk(pixels.reshape(-1, pixels.shape[2]), deep=True,
                                       array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(array)
    return image


def _render(images, path: Path) -> Path:
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0, 0, 0)
    for image in images:
        actor = vtk.vtkImageActor()
        actor.GetMapper().SetInputData(image)
        actor.InterpolateOff()
        renderer.AddActor(actor)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(True)
    window.AddRenderer(renderer)
    rows, columns = images[0].GetDimensions()[1], images[0].GetDimensions()[0]
    window.SetSize(SIZE, int(SIZE * rows / columns))
    renderer.ResetCamera()
    camera = renderer.GetActiveCamera()
    camera.ParallelProjectionOn()
    camera.SetParallelScale(rows / 2)
    window.Render()
    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.Update()
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grabber.GetOutputPort())
    writer.Write()
    window.Finalize()
    return path
